"""`ldm sample` as a script (works under torchrun): python scripts/sample.py --help"""

import sys

from latentdiffusion.cli import main

if __name__ == "__main__":
    sys.exit(main(["sample", *sys.argv[1:]]))
