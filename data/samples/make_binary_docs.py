"""Regenerate the sample documents that are not plain UTF-8 text (used by lab L1.02).

    python data/samples/make_binary_docs.py

- docs/a2_filter_care.txt   Chinese plain text saved in GBK (as many Windows tools still do)
- docs/s1_quick_start.docx  Word document with headings, a bulleted list and a table (python-docx)
- docs/c5_camera_faq.pdf    PDF with numbered headings (fpdf2; its core fonts have no Chinese
                            glyphs, so this one is in English)

The output is deterministic (fixed dates), so re-running it does not change the files.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

DOCS = Path(__file__).resolve().parent / "docs"
FIXED = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)

A2_TXT = """空气净化器 A2 滤芯保养说明

一、更换周期
A2 的替换滤芯建议每 6 个月更换一次。家中有宠物、吸烟者或处于装修后，建议缩短到 4 个月。
App 会在滤芯到期前 7 天推送提醒，滤芯寿命也可以在「云杉家」App 的设备页查看。

二、如何更换滤芯
1. 关闭电源并拔下插头。
2. 打开机身背部的后盖，取出旧滤芯。
3. 撕掉新滤芯的塑料包装袋，按箭头方向放入，盖好后盖。
4. 在 App 设备页点击「重置滤芯寿命」。

三、日常清洁
每两周用软毛刷或吸尘器清理一次机身背部的初效滤网，不要用水冲洗主滤芯。
传感器窗口可以用干棉签轻轻擦拭，保持空气质量读数准确。

四、购买滤芯
替换滤芯售价 199 元，可在云杉官方商城或 App 内购买。已拆封的滤芯不支持无理由退货。
"""

S1_DOCX = [
    ("title", "扫地机器人 S1 快速入门"),
    ("h1", "开箱与充电"),
    ("p", "取出机器人和充电座，把充电座靠墙放置，左右各留出 0.5 米、前方留出 1.5 米的空间。"),
    ("p", "首次使用前请充满电，充满约需 4 小时，一次充满最长可清扫 150 分钟。"),
    ("h1", "连接「云杉家」App"),
    ("li", "确认手机连接的是 2.4 GHz Wi-Fi，S1 不支持 5 GHz 网络。"),
    ("li", "同时按住机身上的电源键和回充键 3 秒，听到「等待配网」后在 App 中添加设备。"),
    ("li", "配网成功后，App 会自动下载最新固件。"),
    ("h1", "指示灯含义"),
    ("table", [["指示灯", "含义"], ["白灯常亮", "工作中或已充满"], ["白灯呼吸", "正在充电"],
               ["红灯闪烁", "故障，请在 App 中查看故障代码"]]),
    ("h1", "扫拖一体使用建议"),
    ("p", "拖地前在 250 ml 水箱中加入清水，不要加入清洁剂或热水。地毯区域请在 App 中设置为禁拖区。"),
]

C5_PDF = [
    ("title", "C5 Wi-Fi Camera FAQ"),
    ("h", "1. Storage options"),
    ("p", "The C5 records to a microSD card of up to 256 GB; the card is sold separately. "
          "You can also subscribe to the cloud plan for 9.9 yuan per month or 99 yuan per year, "
          "which keeps the last 7 days of video."),
    ("h", "2. Night vision"),
    ("p", "Infrared night vision switches on automatically in the dark and reaches about 10 metres. "
          "Keep the lens clean and avoid pointing the camera at a window at night, because the "
          "glass reflects the infrared light."),
    ("h", "3. Camera offline"),
    ("p", "Check that your router's 2.4 GHz band works; the C5 does not support 5 GHz networks. "
          "Then unplug the camera for 10 seconds and plug it in again. If it stays offline, press "
          "the reset hole for 5 seconds and add the camera in the app again."),
    ("h", "4. Sharing with family"),
    ("p", "In the app, open the camera, tap Share and enter your family member's account. Shared "
          "users can watch live video and playback but cannot change the settings."),
]


def write_txt() -> Path:
    path = DOCS / "a2_filter_care.txt"
    path.write_bytes(A2_TXT.encode("gbk"))
    return path


def write_docx() -> Path:
    import docx

    d = docx.Document()
    props = d.core_properties
    props.created = props.modified = FIXED.replace(tzinfo=None)
    props.author = props.last_modified_by = "llmtech"
    props.revision = 1
    for kind, value in S1_DOCX:
        if kind == "title":
            d.add_heading(value, level=0)
        elif kind == "h1":
            d.add_heading(value, level=1)
        elif kind == "li":
            d.add_paragraph(value, style="List Bullet")
        elif kind == "table":
            t = d.add_table(rows=len(value), cols=len(value[0]))
            for r, row in enumerate(value):
                for c, cell in enumerate(row):
                    t.cell(r, c).text = cell
        else:
            d.add_paragraph(value)
    path = DOCS / "s1_quick_start.docx"
    d.save(path)
    _fix_zip_dates(path)
    return path


def _fix_zip_dates(path: Path) -> None:
    """python-docx stamps zip entries with the current time; rewrite them with a fixed date."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        items = [(info.filename, z.read(info)) for info in z.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in items:
            z.writestr(zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0)), data,
                       compress_type=zipfile.ZIP_DEFLATED)


def write_pdf() -> Path:
    from fpdf import FPDF

    pdf = FPDF()
    pdf.set_creation_date(FIXED)
    pdf.set_creator("llmtech")
    pdf.add_page()
    for kind, value in C5_PDF:
        if kind == "title":
            pdf.set_font("Helvetica", "B", 18)
            pdf.multi_cell(0, 10, value, new_x="LMARGIN", new_y="NEXT")
        elif kind == "h":
            pdf.ln(4)
            pdf.set_font("Helvetica", "B", 13)
            pdf.multi_cell(0, 8, value, new_x="LMARGIN", new_y="NEXT")
        else:
            pdf.set_font("Helvetica", "", 11)
            pdf.multi_cell(0, 6, value, new_x="LMARGIN", new_y="NEXT")
    path = DOCS / "c5_camera_faq.pdf"
    pdf.output(str(path))
    return path


if __name__ == "__main__":
    DOCS.mkdir(parents=True, exist_ok=True)
    for p in (write_txt(), write_docx(), write_pdf()):
        print(p.relative_to(DOCS.parents[1]), p.stat().st_size, "bytes")
