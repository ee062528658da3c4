"""Using a trained model: load whatever simoe wrote (loading), route prompts (routing), generate
(generation), and export compact or merged weights (export)."""
