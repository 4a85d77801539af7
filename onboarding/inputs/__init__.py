"""What a run reads: its files, profiles, roster, brand and checked run request."""
