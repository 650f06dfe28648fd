"""CI stand-in for the official PaCoRe package: a different `pacore` from step3vl's (imported as step3vl_pacore)."""

OFFICIAL_STAND_IN = True
