"""Model zoo of the two papers (filled by a later issue)."""
