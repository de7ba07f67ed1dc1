"""``python -m difflab ...`` is the same as ``difflab ...`` (so ``accelerate launch -m difflab train`` works)."""

from difflab.cli import main

if __name__ == "__main__":
    main()
