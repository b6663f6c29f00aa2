from burrow.cli import run

run()
