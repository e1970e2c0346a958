"""Client library (a later issue builds it out)."""
