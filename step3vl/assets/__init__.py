"""Bundled demo assets: demo_shapes.png and demo_problem.json (the question and its expected answer)."""
