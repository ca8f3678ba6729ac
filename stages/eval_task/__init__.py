"""The lm-eval task for GSM8K in the trained answer format (YAML + utils); see gsm8k_answer_format.yaml."""
