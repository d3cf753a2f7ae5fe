"""Framework backends: each loads, finds sites, applies plans and saves; none holds the rules."""
