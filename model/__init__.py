"""Learning core: Dscint network, preprocessing, classifier, phantoms, trainer, metrics.

Never imports node/ or storage/: the CLI hands this package its data.
"""
