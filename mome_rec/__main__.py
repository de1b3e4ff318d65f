import sys

from mome_rec.cli import main

sys.exit(main())
