"""What runs on every Cerulean host (standard library and Debian-packaged libraries only).

It imports nothing from :mod:`cerulean.build`, :mod:`cerulean.release` or
:mod:`cerulean.fleet`: it ships in the images as the ``cerulean-agent``
package with :mod:`cerulean.protocol` and :mod:`cerulean.errors`.
"""
