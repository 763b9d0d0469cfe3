import sys

from fastast.cli import main

sys.exit(main())
