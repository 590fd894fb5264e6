import sys

from autoseg.cli import main

if __name__ == "__main__":  # spawned search workers import this module too, and must not run the CLI
    sys.exit(main())
