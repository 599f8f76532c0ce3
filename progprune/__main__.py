"""`python -m progprune`: the same command as the installed `progprune` script."""
from progprune.cli import main

if __name__ == "__main__":
    main(prog_name="progprune")
