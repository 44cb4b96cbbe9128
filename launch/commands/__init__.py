"""The ``towerrec`` subcommands, one module each: ``add_parser(subparsers)`` adds the parser and
sets ``handler`` (parsed arguments -> exit code). ``launch.cli`` lists them in help order."""
