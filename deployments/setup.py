"""Apply Burrow's Prefect configuration to the server at PREFECT_API_URL:

1. register Burrow's block types (so they can be created in the UI),
2. create the ``burrow`` process work pool if it is missing,
3. deploy every deployment in deployments/prefect.yaml,
4. create the automations in deployments/automations.yaml, wired to a notification block.

Usage: python deployments/setup.py [--notify-block NAME] [--skip-deploy]
Then start a worker:  prefect worker start --pool burrow
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PREFECT = str(Path(sys.executable).parent / "prefect")
BLOCK_MODULES = ["blocks.zookeeper", "blocks.local", "blocks.etcd", "blocks.consul", "blocks.keys", "blocks.s3", "blocks.retention"]


def run(*args: str) -> subprocess.CompletedProcess:
    print("$ prefect " + " ".join(args), flush=True)
    env = {**os.environ, "BURROW_HOME": os.environ.get("BURROW_HOME", str(REPO))}
    proc = subprocess.run([PREFECT, "--no-prompt", *args], cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"prefect {args[0]} {args[1] if len(args) > 1 else ''} failed ({proc.returncode})")
    return proc


def register_block_types() -> None:
    """Register every Burrow block type with the server, in this process (one ``prefect block
    register`` per module would start a new interpreter each time)."""
    import importlib

    from prefect.blocks.core import Block

    for module in BLOCK_MODULES:
        mod = importlib.import_module(module)
        for obj in vars(mod).values():
            if (isinstance(obj, type) and issubclass(obj, Block) and obj.__module__ == module
                    and "_block_type_name" in obj.__dict__):
                obj.register_type_and_schema()
                print(f"registered block type {obj.get_block_type_slug()} ({module})", flush=True)


def notify_block_id(name: str) -> str:
    sys.path.insert(0, str(REPO))
    from prefect.blocks.core import Block

    block = Block.load(name)
    return str(block._block_document_id)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--notify-block", help="saved notification block (slug/name) for the automations")
    p.add_argument("--skip-deploy", action="store_true", help="register blocks and the pool only")
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO))

    register_block_types()
    pools = run("work-pool", "ls").stdout
    if "burrow" not in pools.split():
        run("work-pool", "create", "burrow", "--type", "process")
    if not args.skip_deploy:
        run("deploy", "--all", "--prefect-file", str(HERE / "prefect.yaml"))
    if args.notify_block:
        text = (HERE / "automations.yaml").read_text().replace("${NOTIFY_BLOCK_ID}", notify_block_id(args.notify_block))
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            f.write(text)
        try:
            run("automation", "create", "--from-file", f.name)
        finally:
            os.unlink(f.name)
    else:
        print("automations skipped: pass --notify-block NAME to wire them to a notification block")
    print("done: start a worker with  prefect worker start --pool burrow")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
