#ifndef HOSTNET_DNAT_CNETFILTER_SHIM_H
#define HOSTNET_DNAT_CNETFILTER_SHIM_H
/* No _GNU_SOURCE here: it changes glibc's struct definitions (fd_set's member names), and this module
 * must agree with every other C module a client imports (CYaml, NIO's). */
#include <sched.h>
#include <errno.h>
#include <sys/socket.h>
/* glibc's netinet/in.h before any linux/ header, so that linux/libc-compat.h skips its own in_addr & co. */
#include <netinet/in.h>
#include <linux/netlink.h>
#include <libmnl/libmnl.h>
#include <libnftnl/table.h>
#include <libnftnl/chain.h>
#include <libnftnl/rule.h>
#include <libnftnl/expr.h>
#include <libnftnl/set.h>
#include <libnftnl/batch.h>
#include <libnftnl/udata.h>
#include <libnftnl/common.h>
#include <libnftnl/gen.h>
#include <linux/netfilter.h>
#include <linux/netfilter/nf_tables.h>
#include <linux/netfilter/nfnetlink.h>
/* ctnetlink (conntrack over netlink): message types and CTA_* attributes. */
#include <linux/netfilter/nfnetlink_conntrack.h>

/* Macros and GNU-only declarations that Swift cannot import directly. */

/* MNL_SOCKET_BUFFER_SIZE is a function-like expression (depends on the page size). */
static inline size_t hnd_mnl_socket_buffer_size(void) { return MNL_SOCKET_BUFFER_SIZE; }

/* setns(2) and CLONE_NEWNET are declared only under _GNU_SOURCE (see above): declare them here. */
extern int setns(int fd, int nstype);
#define HND_CLONE_NEWNET 0x40000000
static inline int hnd_setns_net(int fd) { return setns(fd, HND_CLONE_NEWNET); }

static inline int hnd_errno(void) { return errno; }

/* NLMSG_* helpers. */
static inline unsigned int hnd_nlmsg_hdrlen(void) { return NLMSG_HDRLEN; }
static inline unsigned int hnd_nlmsg_align(unsigned int len) { return NLMSG_ALIGN(len); }

/* Netlink socket options that may be missing from older libc headers. */
static inline int hnd_netlink_ext_ack(void) {
#ifdef NETLINK_EXT_ACK
	return NETLINK_EXT_ACK;
#else
	return 11;
#endif
}
static inline int hnd_netlink_cap_ack(void) {
#ifdef NETLINK_CAP_ACK
	return NETLINK_CAP_ACK;
#else
	return 10;
#endif
}

/* CTA_FILTER_ORIG_FLAGS bit "compare the L4 protocol number" of a filtered conntrack dump. The kernel
 * defines it in net/netfilter/nf_internals.h, which is not exported; the value is ABI (kernel 5.8+;
 * older kernels ignore CTA_FILTER and dump everything). */
#define HND_CTA_FILTER_F_CTA_PROTO_NUM 8u
#endif
