"""Generate the offline demo: Chinese-captioned shape images and tiny local towers.

python scripts/make_demo_data.py --output demo_workdir
"""

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", default="demo_workdir", help="directory to write (default: demo_workdir)")
    parser.add_argument("--train_size", type=int, default=1800, help="number of training images")
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args(argv)

    import torch

    from component.testing.demo import make_demo

    torch.manual_seed(options.seed)
    directory = make_demo(options.output, options.train_size, options.seed)
    print(f"demo data and tiny towers written to {directory}")
    return directory


if __name__ == "__main__":
    main()
