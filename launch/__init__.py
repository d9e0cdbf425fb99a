"""absl-flag launchers (filled by a later issue)."""
