/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * request.h: the request sensor's records, state and counters (slow requests
 * of TCP servers). Python mirror: src/ksift/sensors/request.py, checked by
 * tests/unit/test_abi.py.
 */
#ifndef KSIFT_REQUEST_H
#define KSIFT_REQUEST_H

#include "ksift.h"

#define KSIFT_REQ_HEAD_LEN 64     /* first bytes of a request kept (HTTP request line) */
#define KSIFT_REQ_HIST_SLOTS 32   /* log2 buckets of microseconds: slot i holds [2^i, 2^(i+1)) us */
#define KSIFT_REQ_ADDR_LEN 16     /* IPv4 in the first 4 bytes, or IPv6 */

enum ksift_request_record {
	KSIFT_REC_SLOW_REQUEST = KSIFT_REC_REQUEST_BASE + 1, /* one request slower than latency */
};

enum ksift_request_counter {
	KSIFT_CNT_REQ_CONN_ACCEPTED = KSIFT_CNT_SENSOR_BASE, /* SYN_RECV -> ESTABLISHED: server side, tracked */
	KSIFT_CNT_REQ_CONN_CLOSED,     /* tracked connections that reached TCP_CLOSE */
	KSIFT_CNT_REQ_SELF,            /* I/O by ksift itself on a tracked socket: ignored */
	KSIFT_CNT_REQ_STARTED,         /* first read of a request on an idle connection */
	KSIFT_CNT_REQ_DONE,            /* first write of the response: measured, in the histogram */
	KSIFT_CNT_REQ_SLOW,            /* measured requests slower than latency */
	KSIFT_CNT_REQ_EMITTED,         /* slow request records reserved (over the threshold) */
	KSIFT_CNT_REQ_CAPPED,          /* slow over-threshold requests past the window's record cap */
	KSIFT_CNT_REQ_HEAD_MISSED,     /* request bytes not captured (unknown syscall or fault) */
	KSIFT_CNT_REQ_PID_REUSED,      /* per-process stats reset: the tgid now names another process */
};

/* The two ends of a connection. */
struct ksift_req_endpoints {
	__u16 family;           /* KSIFT_AF_INET or KSIFT_AF_INET6 */
	__u16 lport;            /* host byte order */
	__u16 rport;            /* host byte order */
	__u16 pad;
	__u8 laddr[KSIFT_REQ_ADDR_LEN];
	__u8 raddr[KSIFT_REQ_ADDR_LEN];
};

/* Payload of KSIFT_REC_SLOW_REQUEST. */
struct ksift_slow_request {
	__u64 duration_ns;      /* first read of the request -> first write of the response */
	__u64 window_start_ns;  /* ktime of the window's first request */
	__u64 slow_total;       /* slow requests of this process since first seen */
	__u32 window_slow;      /* slow requests in this window, this one included */
	__u32 window_requests;  /* all requests in this window, this one included */
	__u32 threshold;
	__u32 head_len;         /* valid bytes in head[] */
	struct ksift_req_endpoints ends;
	__u8 head[KSIFT_REQ_HEAD_LEN];
};

/* Per accepted connection, in an LRU hash keyed by the struct sock pointer. */
struct ksift_req_conn {
	__u64 start_ns;         /* 0: idle (waiting for the next request) */
	__u32 head_len;
	__u32 pad;
	__u8 head[KSIFT_REQ_HEAD_LEN];
};

/* Per-process request statistics, in an LRU hash keyed by tgid. */
struct ksift_req_stats {
	__u64 start_boottime_ns;  /* the process these stats belong to (pid reuse) */
	__u64 window_start_ns;
	__u64 requests;           /* all requests since first seen */
	__u64 slow;               /* slow requests since first seen */
	__u64 max_ns;             /* slowest request since first seen */
	__u64 window_max_ns;      /* slowest request of this window */
	__u32 window_requests;
	__u32 window_slow;
	__u32 window_emitted;     /* records emitted in this window (capped) */
	__u32 window_max_head_len;
	__u8 window_max_head[KSIFT_REQ_HEAD_LEN]; /* first bytes of the window's slowest request */
	struct ksift_req_endpoints window_max_ends; /* and its connection */
	__u64 hist[KSIFT_REQ_HIST_SLOTS]; /* every request since first seen, by log2(us) */
};

#endif /* KSIFT_REQUEST_H */
