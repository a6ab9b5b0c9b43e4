"""`ldm train` as a script (works under torchrun): python scripts/train_ldm.py --help"""

import sys

from latentdiffusion.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
