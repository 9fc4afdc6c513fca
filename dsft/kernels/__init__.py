"""The math of the fast paths, as pure functions, each with a plain-torch reference it is tested against."""
