import sys

from throttllem._cli import main

sys.exit(main())
