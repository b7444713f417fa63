"""Graph passes: they rewrite FX graphs and do no math of their own."""
