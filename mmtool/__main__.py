"""`python -m mmtool` runs the command line."""

from mmtool.cli import main

if __name__ == "__main__":
    main()
