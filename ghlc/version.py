"""The ghlc version (its own module, so that modules recording it need not import the
package they belong to)."""

__version__ = "0.1.0"
