"""straggler.analysis"""
