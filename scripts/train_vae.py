"""`ldm train-vae` as a script (works under torchrun): python scripts/train_vae.py --help"""

import sys

from latentdiffusion.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-vae", *sys.argv[1:]]))
