import sys

from ksift.cli.main import main

sys.exit(main())
