"""Data layer: phantom generation, HDF5/TFRecord datamodules, conversion and inspection tools.

Import the datamodules from their modules (``datamodules.hdf5.HDF5SegDataModule``,
``datamodules.tfrecord.TFRecordSegDataModule``) so that importing the package stays cheap.
"""
