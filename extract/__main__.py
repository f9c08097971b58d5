from runtime.process import exit_with, start_command

start_command()
from extract.cli import main  # noqa: E402

exit_with(main())
