/*
 * broker/ssp/_speedups_deflate.c: zlib.compress(raw)'s bytes for a short
 * instruction (an ack, a small report: at most TINY_INPUT bytes), without
 * zlib, where it can say for certain.
 *
 * Why: for a few dozen bytes zlib spends about 3 us, most of it building
 * the Huffman trees of a dynamic block only to compare its size with the
 * fixed block's; a short instruction nearly always goes out in a fixed
 * (or stored) block. This file does what zlib's deflate does at level 6
 * (window 15; the matches of its lazy evaluation: deflate_slow and
 * longest_match, with their chain limits, their hash of three bytes and
 * their blind spot at position 0), counts the fixed block's exact size,
 * and a lower bound of the dynamic block's (the entropy of the symbols,
 * the block header's least bits). Only when the fixed block is no larger
 * than that bound is zlib's choice known without building the trees:
 * then the fixed or the stored block, whichever zlib picks, is written
 * here. Otherwise (a short, very repetitive input) it says nothing and
 * zlib compresses.
 *
 * The bytes are zlib's (tests/ssp/test_deflate_tiny.py compares them with
 * zlib.compress and with the reference's memLevel-1 stream over real
 * instructions and random and repetitive inputs); the matches are those
 * of broker/ssp/instruction.py's compressobj (memLevel 1: a 256-entry
 * hash), which gives the same bytes as zlib.compress for inputs this short.
 */

#include "_speedups.h"

#define TINY_INPUT 96           /* the longest input taken (SMALL_INSTRUCTION) */
#define MIN_MATCH 3
#define MAX_MATCH 258
#define PAD (MAX_MATCH + 2)     /* zeros after the input: zlib's WIN_INIT */
#define MAX_CHAIN 128           /* level 6: max_chain, good, lazy, nice */
#define GOOD_LENGTH 8
#define MAX_LAZY 16
#define NICE_LENGTH 128
#define TOO_FAR 4096
#define HASH_SIZE 256           /* memLevel 1: hash_bits 8, shift 3 */
#define L_CODES 286
#define D_CODES 30
#define END_BLOCK 256
#define OUT_SIZE 192            /* a fixed block of 96 literals: 2 + 110 + 4 */

static const uint16_t length_base[29] = {
    3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59,
    67, 83, 99, 115, 131, 163, 195, 227, 258};
static const uint8_t length_extra[29] = {
    0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4,
    5, 5, 5, 5, 0};
static const uint16_t dist_base[D_CODES] = {
    1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385,
    513, 769, 1025, 1537, 2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577};
static const uint8_t dist_extra[D_CODES] = {
    0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10,
    11, 11, 12, 12, 13, 13};

typedef struct {
    uint16_t dist;   /* 0: a literal */
    uint16_t value;  /* the literal, or the match's length */
} Symbol;

static int
length_code(int length)
{
    int code = 28;
    while (length_base[code] > length)
        code--;
    return code;   /* (258 is code 28, 285, as zlib has it) */
}

static int
dist_code(int dist)
{
    int code = D_CODES - 1;
    while (dist_base[code] > dist)
        code--;
    return code;
}

/* Built once: f * log2(f) for the symbol counts an input this short can
 * have; the fixed code of each literal/length symbol and distance code
 * (RFC 1951 3.2.6), bit-reversed as deflate sends Huffman codes. */
static double f_log2_f[TINY_INPUT + 2];
static uint16_t fixed_code[288];
static uint8_t fixed_length[288];
static uint8_t dist_code_reversed[D_CODES];
static int tables_ready;

static unsigned
reversed(unsigned code, int length)
{
    unsigned result = 0;
    while (length-- > 0) {
        result = (result << 1) | (code & 1);
        code >>= 1;
    }
    return result;
}

static void
build_tables(void)
{
    for (int f = 1; f < TINY_INPUT + 2; f++)
        f_log2_f[f] = f * log2((double)f);
    for (int symbol = 0; symbol < 288; symbol++) {
        unsigned code;
        int length;
        if (symbol < 144)
            code = 0x30 + symbol, length = 8;
        else if (symbol < 256)
            code = 0x190 + symbol - 144, length = 9;
        else if (symbol < 280)
            code = symbol - 256, length = 7;
        else
            code = 0xC0 + symbol - 280, length = 8;
        fixed_code[symbol] = (uint16_t)reversed(code, length);
        fixed_length[symbol] = (uint8_t)length;
    }
    for (int code = 0; code < D_CODES; code++)
        dist_code_reversed[code] = (uint8_t)reversed((unsigned)code, 5);
    tables_ready = 1;
}

/* The symbols of a tree, as a bit set: words[i / 64] bit i % 64. */
#define SET_WORDS 5
#define SET_ADD(words, i) ((words)[(i) >> 6] |= (uint64_t)1 << ((i) & 63))

static int
lowest_bit(uint64_t word)
{
#if defined(__GNUC__)
    return __builtin_ctzll(word);
#else
    int i = 0;
    while (!(word & 1)) {
        word >>= 1;
        i++;
    }
    return i;
#endif
}

/* -(sum of f * log2(f / total)) over the counts of the set's symbols: the
 * least bits any prefix code spends on them (their entropy). */
static double
entropy_bits(const uint64_t *words, const uint8_t *freq, int total)
{
    double sum = 0.0;
    for (int w = 0; w < SET_WORDS; w++) {
        for (uint64_t word = words[w]; word; word &= word - 1)
            sum += f_log2_f[freq[(w << 6) + lowest_bit(word)]];
    }
    return f_log2_f[total] - sum;
}

/* zlib's longest_match for a window holding only this input. */
static int
longest_match(const unsigned char *buf, const int16_t *prev, int cur,
              int strstart, int prev_length, int lookahead, int *match_start)
{
    unsigned chain = MAX_CHAIN;
    int best = prev_length;
    int nice = NICE_LENGTH;
    const unsigned char *scan = buf + strstart;
    if (prev_length >= GOOD_LENGTH)
        chain >>= 2;
    if (nice > lookahead)
        nice = lookahead;
    unsigned char end1 = scan[best - 1], end = scan[best];
    do {
        const unsigned char *match = buf + cur;
        if (match[best] != end || match[best - 1] != end1
                || match[0] != scan[0] || match[1] != scan[1])
            continue;
        /* The third byte is equal: same hash, same first two (zlib skips it). */
        int len = 3;
        while (len < MAX_MATCH && scan[len] == match[len])
            len++;
        if (len > best) {
            *match_start = cur;
            best = len;
            if (len >= nice)
                break;
            end1 = scan[best - 1];
            end = scan[best];
        }
    } while ((cur = prev[cur]) > 0 && --chain != 0);
    return best <= lookahead ? best : lookahead;
}

/* The least bits of a run of zero code lengths in zlib's scan_tree: runs
 * by 138; 3-10 or 11-138 in one code with 3 or 7 extra bits; else one code
 * each. */
static double
zeros_bits(int zeros)
{
    int rest = zeros % 138;
    return 8.0 * (zeros / 138) + (rest < 3 ? rest : (rest <= 10 ? 4 : 8));
}

/* The code-length sequence 0..max_code of a tree whose used entries (the
 * set; max_code its largest) have lengths above zero: the least bits its
 * run-length coding takes (zero runs as zeros_bits; a code of at least one
 * bit covers at most six equal lengths, a lone length takes one). */
static double
lengths_bits(const uint64_t *words)
{
    double bits = 0.0;
    int next = 0;   /* the first entry not yet counted */
    int run = 0;    /* used entries in a row, up to next */
    for (int w = 0; w < SET_WORDS; w++) {
        for (uint64_t word = words[w]; word; word &= word - 1) {
            int i = (w << 6) + lowest_bit(word);
            if (i != next || run == 0) {
                if (run)
                    bits += run < 2 ? 1.0 : run / 2.0;
                bits += zeros_bits(i - next);
                run = 0;
            }
            run++;
            next = i + 1;
        }
    }
    if (run)
        bits += run < 2 ? 1.0 : run / 2.0;
    return bits;
}

typedef struct {
    unsigned char *out;
    Py_ssize_t size;
    uint64_t bits;
    int count;
} BitWriter;

static void
put_bits(BitWriter *w, unsigned value, int length)
{
    w->bits |= (uint64_t)value << w->count;
    w->count += length;
    while (w->count >= 8) {
        w->out[w->size++] = (unsigned char)w->bits;
        w->bits >>= 8;
        w->count -= 8;
    }
}

/* A literal/length symbol in the fixed code. */
static void
put_fixed(BitWriter *w, int symbol)
{
    put_bits(w, fixed_code[symbol], fixed_length[symbol]);
}

SP_INTERNAL PyObject *
deflate_tiny(const unsigned char *raw, Py_ssize_t size)
{
    if (size < 0 || size > TINY_INPUT)
        return NULL;
    if (!tables_ready)
        build_tables();
    int n = (int)size;
    unsigned char buf[TINY_INPUT + PAD];
    memcpy(buf, raw, (size_t)n);
    memset(buf + n, 0, PAD);

    /* deflate_slow: lazy matching; every position up to n - 3 is hashed
     * once, in order (its chain: the earlier ones of the same hash). */
    int16_t head[HASH_SIZE];
    int16_t prev[TINY_INPUT + 1];
    memset(head, 0, sizeof(head));
    Symbol symbols[TINY_INPUT];
    int nsymbols = 0;
    int strstart = 0, lookahead = n;
    int match_length = MIN_MATCH - 1, prev_length, match_start = 0;
    int prev_match, match_available = 0;
#define INSERT(p, found) do { \
        unsigned h_ = ((buf[p] << 6) ^ (buf[(p) + 1] << 3) ^ buf[(p) + 2]) \
                      & (HASH_SIZE - 1); \
        (found) = head[h_]; prev[p] = head[h_]; head[h_] = (int16_t)(p); \
    } while (0)
    while (lookahead > 0) {
        int hash_head = 0;
        if (lookahead >= MIN_MATCH)
            INSERT(strstart, hash_head);
        prev_length = match_length;
        prev_match = match_start;
        match_length = MIN_MATCH - 1;
        if (hash_head != 0 && prev_length < MAX_LAZY) {
            match_length = longest_match(buf, prev, hash_head, strstart,
                                         prev_length, lookahead, &match_start);
            if (match_length == MIN_MATCH && strstart - match_start > TOO_FAR)
                match_length = MIN_MATCH - 1;
        }
        if (prev_length >= MIN_MATCH && match_length <= prev_length) {
            int max_insert = strstart + lookahead - MIN_MATCH;
            symbols[nsymbols].dist = (uint16_t)(strstart - 1 - prev_match);
            symbols[nsymbols].value = (uint16_t)prev_length;
            nsymbols++;
            lookahead -= prev_length - 1;
            prev_length -= 2;
            do {
                if (++strstart <= max_insert) {
                    int ignored;
                    INSERT(strstart, ignored);
                    (void)ignored;
                }
            } while (--prev_length != 0);
            match_available = 0;
            match_length = MIN_MATCH - 1;
            strstart++;
        }
        else if (match_available) {
            symbols[nsymbols].dist = 0;
            symbols[nsymbols].value = buf[strstart - 1];
            nsymbols++;
            strstart++;
            lookahead--;
        }
        else {
            match_available = 1;
            strstart++;
            lookahead--;
        }
    }
#undef INSERT
    if (match_available) {
        symbols[nsymbols].dist = 0;
        symbols[nsymbols].value = buf[strstart - 1];
        nsymbols++;
    }

    /* The fixed block's exact bits (zlib's static_len), the symbols' counts
     * and extra bits. */
    uint8_t lfreq[L_CODES], dfreq[D_CODES];
    memset(lfreq, 0, sizeof(lfreq));
    memset(dfreq, 0, sizeof(dfreq));
    long fixed_bits = 7;   /* END_BLOCK */
    long extra_bits = 0;
    for (int i = 0; i < nsymbols; i++) {
        if (symbols[i].dist == 0) {
            int c = symbols[i].value;
            lfreq[c]++;
            fixed_bits += c < 144 ? 8 : 9;
        }
        else {
            int lc = length_code(symbols[i].value);
            int dc = dist_code(symbols[i].dist);
            lfreq[257 + lc]++;
            dfreq[dc]++;
            int extra = length_extra[lc] + dist_extra[dc];
            fixed_bits += (257 + lc < 280 ? 7 : 8) + 5 + extra;
            extra_bits += extra;
        }
    }
    lfreq[END_BLOCK] = 1;

    /* A lower bound of the dynamic block's bits (zlib's opt_len): the
     * symbols' entropy, their extra bits, the header (5+5+4 bits, at
     * least four 3-bit code-length codes) and its code-length sequences,
     * in which zlib gives a tree of fewer than two codes a second one. */
    uint64_t used_l[SET_WORDS] = {0}, used_d[SET_WORDS] = {0};
    int lused = 0, dused = 0, dmax = -1, dtotal = 0;
    for (int i = 0; i < L_CODES; i++) {
        if (lfreq[i]) {
            SET_ADD(used_l, i);
            lused++;
        }
    }
    double bound = 14 + 12 + entropy_bits(used_l, lfreq, nsymbols + 1)
                   + (double)extra_bits;
    if (lused < 2)
        SET_ADD(used_l, 0);   /* (max_code is END_BLOCK's: the new code is 0) */
    for (int i = 0; i < D_CODES; i++) {
        if (dfreq[i]) {
            SET_ADD(used_d, i);
            dused++;
            dtotal += dfreq[i];
            dmax = i;
        }
    }
    if (dused)
        bound += entropy_bits(used_d, dfreq, dtotal);
    for (int added = dused; added < 2; added++) {
        if (dmax < 2) {
            dmax++;
            SET_ADD(used_d, dmax);
        }
        else
            SET_ADD(used_d, 0);
    }
    bound += lengths_bits(used_l) + lengths_bits(used_d);
    long least_dynamic = (long)ceil(bound - 1e-6);
    long fixed_bytes = (fixed_bits + 3 + 7) >> 3;
    if (fixed_bytes > ((least_dynamic + 3 + 7) >> 3))
        return NULL;   /* a dynamic block might be smaller: zlib decides */

    /* zlib's choice, the dynamic block ruled out: stored if no larger. */
    unsigned char out[OUT_SIZE];
    BitWriter w = {out, 0, 0, 0};
    out[w.size++] = 0x78;   /* deflate, window 15; level 6 */
    out[w.size++] = 0x9c;
    if (n + 4 <= fixed_bytes) {
        out[w.size++] = 0x01;   /* final, stored */
        out[w.size++] = (unsigned char)n;
        out[w.size++] = (unsigned char)(n >> 8);
        out[w.size++] = (unsigned char)~n;
        out[w.size++] = (unsigned char)(~n >> 8);
        memcpy(out + w.size, raw, (size_t)n);
        w.size += n;
    }
    else {
        put_bits(&w, 3, 3);     /* final, fixed codes */
        for (int i = 0; i < nsymbols; i++) {
            int dist = symbols[i].dist, value = symbols[i].value;
            if (dist == 0) {
                put_fixed(&w, value);
                continue;
            }
            int lc = length_code(value), dc = dist_code(dist);
            put_fixed(&w, 257 + lc);
            if (length_extra[lc])
                put_bits(&w, (unsigned)(value - length_base[lc]), length_extra[lc]);
            put_bits(&w, dist_code_reversed[dc], 5);
            if (dist_extra[dc])
                put_bits(&w, (unsigned)(dist - dist_base[dc]), dist_extra[dc]);
        }
        put_fixed(&w, END_BLOCK);
        if (w.count > 0)
            put_bits(&w, 0, 8 - w.count);
    }
    /* adler32, big-endian (no reduction needed before the end: at most
     * 96 bytes) */
    uint32_t a = 1, b = 0;
    for (int i = 0; i < n; i++) {
        a += raw[i];
        b += a;
    }
    a %= 65521;
    b %= 65521;
    out[w.size++] = (unsigned char)(b >> 8);
    out[w.size++] = (unsigned char)b;
    out[w.size++] = (unsigned char)(a >> 8);
    out[w.size++] = (unsigned char)a;
    return PyBytes_FromStringAndSize((const char *)out, w.size);
}
