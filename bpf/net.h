/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * net.h: the net sensor's records, state and counters (connection storms: one
 * process opening many outgoing TCP connections to one address and port).
 * Python mirror: src/ksift/sensors/net.py, checked by tests/unit/test_abi.py.
 */
#ifndef KSIFT_NET_H
#define KSIFT_NET_H

#include "ksift.h"

enum ksift_net_record {
	KSIFT_REC_CONNECT_CROSSING = KSIFT_REC_NET_BASE + 1, /* a (process, destination) crossed the threshold */
};

enum ksift_net_counter {
	KSIFT_CNT_CONNECT_SEEN = KSIFT_CNT_SENSOR_BASE, /* TCP sockets entering SYN_SENT */
	KSIFT_CNT_CONNECT_SELF,        /* by ksift itself: filtered */
	KSIFT_CNT_CONNECT_OTHER_FAMILY, /* neither IPv4 nor IPv6: filtered */
	KSIFT_CNT_CONNECT_AGGREGATED,  /* attempts counted in the per-destination map */
	KSIFT_CNT_CONNECT_CROSSINGS,   /* threshold crossings (one per key per window) */
};

/* What connection attempts are counted by. An IPv4-mapped IPv6 destination is
 * stored as IPv4, so a dual-stack client counts once per real destination. */
struct ksift_connect_key {
	__u32 tgid;
	__u16 family;           /* KSIFT_AF_INET or KSIFT_AF_INET6 */
	__u16 port;             /* destination port, host byte order */
	__u8 addr[16];          /* IPv4: the first 4 bytes, rest zero; network byte order */
};

struct ksift_connect_state {
	struct ksift_window win;  /* attempts of this key */
};

struct ksift_connect_crossing {
	struct ksift_crossing head; /* attempts of this key */
	struct ksift_connect_key key;
};

#endif /* KSIFT_NET_H */
