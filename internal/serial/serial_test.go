package serial

import (
	"math/big"
	"testing"
)

func TestParseAcceptsEveryCommonSpelling(t *testing.T) {
	want := "a1b2c3"
	for _, in := range []string{
		"a1b2c3", "A1B2C3", "00A1B2C3", "0x00a1b2c3", "0XA1B2C3",
		"serial=00A1B2C3", "serial=A1B2C3\n", " a1:b2:c3 ", "00:A1:B2:C3", "0:a1:b2:c3",
	} {
		got, err := Normalize(in)
		if err != nil || got != want {
			t.Errorf("Normalize(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
}

func TestParseRefusesWhatIsNotHex(t *testing.T) {
	for _, in := range []string{"", "0x", "12345g", "a1::b2", "a1:b2c3", "-12", "1 2", "serial="} {
		if got, err := Normalize(in); err == nil {
			t.Errorf("Normalize(%q) = %q; want an error", in, got)
		}
	}
}

func TestFormatRoundTrips(t *testing.T) {
	for _, n := range []*big.Int{big.NewInt(1), big.NewInt(255), new(big.Int).Lsh(big.NewInt(1), 127)} {
		s := Format(n)
		back, err := Parse(s)
		if err != nil || back.Cmp(n) != 0 {
			t.Errorf("Parse(Format(%v)) = %v, %v", n, back, err)
		}
	}
	if got := Format(big.NewInt(0xab)); got != "ab" {
		t.Errorf("Format(0xab) = %q; want lowercase hex without leading zeros", got)
	}
}

// A one-digit colon group is one byte (some tools print bytes below 0x10
// with one digit): f4:d:91 is f40d91, never f4d91.
func TestParsePadsOneDigitGroups(t *testing.T) {
	for in, want := range map[string]string{
		"f4:d:91":                "f40d91",
		"f5:20:ad:8a:f4:d:91:2e": "f520ad8af40d912e",
		"1a:7:0":                 "1a0700",
		"a:b:c":                  "a0b0c",
	} {
		if got, err := Normalize(in); err != nil || got != want {
			t.Errorf("Normalize(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
}
