"""Framework-free core: fold algebra, legality rules, report, output comparison, file writing."""
