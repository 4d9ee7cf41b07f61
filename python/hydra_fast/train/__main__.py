import sys

from hydra_fast.train.cli import main

sys.exit(main())
