import sys

from deftune.cli import main

sys.exit(main())
