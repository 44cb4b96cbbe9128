from launch_helpers import valid_config  # noqa: F401  (fixture)
