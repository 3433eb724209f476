import sys

from analog.cli import main

sys.exit(main())
