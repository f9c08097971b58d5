from extract.cli import main
from runtime.exit import exit_with

exit_with(main())
