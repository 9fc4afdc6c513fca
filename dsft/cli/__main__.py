from dsft.cli.main import run

run()
