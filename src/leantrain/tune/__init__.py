"""`leantrain tune`: Optuna studies of a recipe, each trial a real leantrain run."""
