"""Setup profiles shipped with throttLL'eM (TOML, loaded with `throttllem._twin.load_profile`)."""
