"""Evaluator service: samples a trained checkpoint on the benchmark suites, pass@k / acc@1 / Overall."""
