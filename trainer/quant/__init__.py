"""Int8 quantization of segmentation networks: fake quantization, calibration, PTQ, QDQ export.

One concern per module (imported directly; nothing is imported here so that
``import trainer.quant.fake_quant`` does not pull in onnx):

* ``fake_quant``  numerics (symmetric int8, zero-point 0) and ``TensorQuantizer``
* ``modules``     quantized Conv/ConvTranspose/Linear layers and the in-place layer swap
* ``calibrate``   max / percentile / mse range estimation
* ``convert``     which layers to quantize, the structural record, ``quantize_net``
* ``ptq``         post-training quantization of a checkpoint (``launch.py quantize``)
* ``export_qdq``  QuantizeLinear/DequantizeLinear ONNX in TensorRT's explicit layout
* ``qdq_check``   static checker of such a graph

QAT itself is the callback ``trainer.callbacks.qat.QuantizationAwareTraining``.
See ``README_quant.md``.
"""
