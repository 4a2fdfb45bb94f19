"""The journal's old single module, now store/segment.py (format), reader.py and writer.py.

Re-exports their names until every importer uses the new modules. moved: removed in the sweep
"""

# moved: removed in the sweep
from pibackup.store.fsio import fsync_dir as fsync_dir
from pibackup.store.fsio import fsync_file as fsync_file
from pibackup.store.reader import SegmentReader as SegmentReader
from pibackup.store.reader import SegmentScan as SegmentScan
from pibackup.store.reader import scan_segment as scan_segment
from pibackup.store.segment import DEFLATE_LEVEL as DEFLATE_LEVEL
from pibackup.store.segment import ENCODING_DEFLATE as ENCODING_DEFLATE
from pibackup.store.segment import ENCODING_PLAIN as ENCODING_PLAIN
from pibackup.store.segment import ENCODINGS as ENCODINGS
from pibackup.store.segment import FLAG_DEFLATE as FLAG_DEFLATE
from pibackup.store.segment import FORMAT_VERSION as FORMAT_VERSION
from pibackup.store.segment import FRAME_HEADER_SIZE as FRAME_HEADER_SIZE
from pibackup.store.segment import HEADER_SIZE as HEADER_SIZE
from pibackup.store.segment import KIND_INFO as KIND_INFO
from pibackup.store.segment import KIND_PRAGMA as KIND_PRAGMA
from pibackup.store.segment import KIND_TX as KIND_TX
from pibackup.store.segment import KINDS as KINDS
from pibackup.store.segment import MAX_INFLATED as MAX_INFLATED
from pibackup.store.segment import MAX_PAYLOAD as MAX_PAYLOAD
from pibackup.store.segment import SEGMENT_MAGIC as SEGMENT_MAGIC
from pibackup.store.segment import Frame as Frame
from pibackup.store.segment import JournalError as JournalError
from pibackup.store.segment import SegmentHeader as SegmentHeader
from pibackup.store.segment import decode_header as decode_header
from pibackup.store.segment import decode_statements as decode_statements
from pibackup.store.segment import encode_frame as encode_frame
from pibackup.store.segment import encode_statements as encode_statements
from pibackup.store.writer import SegmentLeftBehind as SegmentLeftBehind
from pibackup.store.writer import SegmentWriter as SegmentWriter
from pibackup.store.writer import trim_zeros as trim_zeros
