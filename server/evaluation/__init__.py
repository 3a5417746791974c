"""Golden-set evaluation of adapter versions on the serving engine: the set, the scores, the report."""
