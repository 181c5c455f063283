"""SmolExpert: Expert Token Routing on SmolLM2-135M-Instruct with experts fine-tuned on real facts."""
