"""Training data: converting public datasets into the Qwen-VL conversation format."""

from qwenvl.data.convert import ConvertSummary, MalformedRecord, convert_llava, convert_records

__all__ = ["ConvertSummary", "MalformedRecord", "convert_llava", "convert_records"]
