"""PaCoRe: parallel coordinated reasoning on the step3vl engine."""
