"""Ordering rules with a time bound: "A must be followed by B within T".

Syntax::

    A followed_by B within DURATION [from end | from start]

``A`` and ``B`` are span selectors as in the DSL (``pii.access``,
``payment.charge.where(amount > 1000)``, a quoted name) or a TraceQL spanset
filter (``{ span.http.status_code >= 500 }``). ``followed by`` (two words) is
accepted too. ``DURATION`` uses TraceQL units (``ns us ms s m h``, ``1m30s``).

Semantics: every A span needs some *other* B span in the same trace whose
start lies in ``[anchor, anchor + T]``, where the anchor is A's end
(default, "after A completed") or A's start (``from start``, for B spans
nested inside A). Each A span without such a B is a violation once its
deadline ``anchor + T`` has passed: ``evaluate(traces, now_ns=...)`` treats
A spans whose deadline is still after ``now_ns`` as pending, not violated;
without ``now_ns`` the traces are judged final. ``deadline_ns`` reports, per
trace with an unmatched A, the earliest such deadline: from then on the
trace's violation is certain whatever spans still arrive.
"""
